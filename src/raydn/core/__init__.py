"""The bottom layer: the contracts every other part of raydn shares.

* :mod:`raydn.core.batch` -- :class:`FrameBatch` (one frame per batch slot, the model's input) and
  :func:`check_frame_batch` (its input checks);
* :mod:`raydn.core.state` -- :class:`TemporalState` (the streaming memory the model returns and takes);
* :mod:`raydn.core.outputs` -- the model's typed outputs (:class:`Selection`);
* :mod:`raydn.core.frames` -- rotations (quaternions ``w, x, y, z``), pose matrices
  ``pose_matrix(rotation, translation)`` and boxes to the global frame: the one implementation;
* :mod:`raydn.core.graph_contract` -- the exported ONNX graph contract (file names, input / output
  names and meanings, metadata schema, fingerprint keys) shared by ``interop.export`` and ``deploy``.

Layering: ``raydn.core`` imports nothing of raydn but :mod:`raydn.errors`; every other package may
import it. Import its modules directly (``from raydn.core.batch import FrameBatch``); this package
file imports nothing so that a light module (``core.frames``, numpy only) does not pull in torch.
"""
