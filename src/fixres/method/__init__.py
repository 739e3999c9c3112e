"""The FixRes method itself: apparent object size (eq. 5), evaluation at any test size, fine-tuning at the
test size with the frozen-prefix cache, label-free adaptation, activation statistics, calibration, and
training at a low size with repeated augmentation."""
