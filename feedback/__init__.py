"""What the votes become: the torch-free store (`feedback.store`) and the GPU training job (`feedback.training`)."""
