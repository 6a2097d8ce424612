"""What both phases share: errors, files and checkpoints, the pool folder's manifest, datasets, network families,
the task hierarchy, a query's classes, the Runtime's precision, one consolidated forward and its evaluation."""
