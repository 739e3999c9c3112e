"""Photos to tensors: ImageFolder indexing and the class-set rule, robust decoding, train/test geometry
(the one vocabulary ``train_size``, ``test_size``, ``crop_ratio``) and the embedded data set."""
