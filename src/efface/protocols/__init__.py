"""Real-model evaluation protocols: which prompts (with which seeds and guidance) to generate.

``load_protocol(name, path=None, **kw)`` returns a list of :class:`EvalPrompt`; :data:`PROTOCOLS`
lists the names (``i2p``, ``ring-a-bell``, ``unlearndiffatk-nudity``, ``imagenette``, ``artists``,
``celebrities``, ``coco``). Protocol modules are imported only when their loader runs.
"""

from efface.protocols.base import PROTOCOLS, EvalPrompt, load_protocol

__all__ = ["PROTOCOLS", "EvalPrompt", "load_protocol"]
