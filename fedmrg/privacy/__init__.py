"""What the coordinator may learn: client-level differential privacy (`dp`), the linear
aggregate that central DP and secure aggregation share (`linear`), pairwise-masked secure
aggregation (`secagg`), and their place in a round (`server`, `client`). docs/privacy.md.

Pure logic, no Ray; the coordinator and the client call it through small hooks.
"""

from __future__ import annotations


class PrivacyError(ValueError):
    """A privacy setting cannot hold for this run, or a protocol step failed; the message names
    the key, center or step."""
