"""gpucrypt: GPU-accelerated bulk encryption, byte-identical to OpenSSL and libsodium."""

__version__ = "0.1.0"
