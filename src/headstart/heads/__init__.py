"""The classification head: its configuration and numpy inference (`config`, torch-free) and the torch module
(`module`)."""

from headstart.heads.config import HeadConfig, head_proba

__all__ = ["HeadConfig", "head_proba"]
