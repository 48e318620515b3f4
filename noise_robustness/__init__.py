"""How additive Gaussian pixel noise hurts image classifiers: a PyTorch Lightning study on MNIST."""
