"""Training backends behind one interface: PyTorch (CPU/CUDA) and MLX (Apple GPU, or mlx[cpu])."""
