"""``python -m rddm_infer``: the same as the ``rddm-infer`` command."""

from .cli import main

main()
