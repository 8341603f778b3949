"""Restoring images with a loaded model: the array core (:mod:`.arrays`), tiling and pixel shuffle
(:mod:`.tiling`), the jobs layer (:mod:`.jobs`), and the two executors that run jobs: this process
(:mod:`.local`) and Ray (:mod:`.ray_executor`)."""
