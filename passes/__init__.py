"""Graph passes that find dense attention in torch.fx graphs and rewrite it to the ``dsa`` ops."""
