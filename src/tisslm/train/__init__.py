"""Training: the loop (trainer), checkpoints that resume exactly (checkpoint), the torchrun
launcher (launch) and the matmul peak behind MFU (perf)."""
