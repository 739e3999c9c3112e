"""Models: building one with exactly one source of weights, finding the parts FixRes adapts by tracing,
input sizes, hooks that are always removed, batch norms folded for evaluation, and writing an export."""
