"""Dataset-scale pipeline: training (pipeline.training) and batch jobs built on m2t_core."""
