"""The pieces a transformer block is made of, each a forward/backward pair built from `ops`:
the dense feed-forward network, the attention block, and the Mixture-of-Experts layer."""
