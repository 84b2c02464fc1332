"""The model neuron runs: its forward pass (``forward``) and the weight formats it reads
(``quant``)."""
