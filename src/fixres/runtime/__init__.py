"""Where and how the code runs: process topology (torchrun), precision and devices, progress lines."""
