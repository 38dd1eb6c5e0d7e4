"""What a network costs and how well it does: MACs in both conventions, latency, accuracy."""
