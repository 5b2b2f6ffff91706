"""Linear probes (the paper's Table 1): backbones (teacher, teacher at a layer, surrogate run, splice), cached
features, classification / segmentation / depth heads trained as learning-rate grids, and the table."""
