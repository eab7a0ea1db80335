"""gossipfl: serverless federated learning by compressed gossip averaging.

The pipeline, one module per stage:

    train     a task's local steps move the model; the gossip round measures the delta
    compress  top-k sparsification, int8/int4 quantization, error feedback
    codec     the signed, versioned wire message (docs/wire-format.md)
    transport HTTP between peers (aiohttp), size caps before anything is read
    merge     folds a decoded delta into a float32 vector (C kernel or numpy)
    gossip    the CHOCO-style exchange protocol and its per-edge state
    node      wires the above together into one daemon
    cli       the ``gossipfl`` command
"""

__version__ = "0.1.0"
