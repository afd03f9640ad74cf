"""edgeloom's federated benchmark: the Flower arm."""
