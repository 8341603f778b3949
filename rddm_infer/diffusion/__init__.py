"""The RDDM math, free of any engine: schedules and sampling plans, the reverse update, the graph kinds
(each with the driver that calls it), the loop that drives any runner, and the metadata an artifact carries.
Imports nothing above it (numpy only)."""
