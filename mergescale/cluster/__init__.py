"""Everything Ray: merge actors and placement, evaluation replicas, job entry points
(`python -m mergescale.cluster.job`)."""
