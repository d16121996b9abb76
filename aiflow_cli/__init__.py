"""aiflow: split AI inference across device, edge and cloud, shipping compressed activations over QUIC.

The public surface is small: :mod:`aiflow_cli.codec` (tensor frames), :mod:`aiflow_cli.transport` (QUIC
endpoints), :mod:`aiflow_cli.models` (models as chains of stages), :mod:`aiflow_cli.profile`,
:mod:`aiflow_cli.plan` and :mod:`aiflow_cli.runtime`. Errors are :class:`aiflow_cli.errors.AiflowError`.
"""

from aiflow_cli.errors import AiflowError

__version__ = "0.1.0"
__all__ = ["AiflowError", "__version__"]
