"""The phantom multi-center benchmark: synthetic chest radiographs + reports, dual heterogeneity.

See docs/phantom.md. `PHANTOM_VERSION` names the benchmark: any change to what the generator
writes for a given seed (images, reports, labels, splits) must bump it.
"""

from fedmrg.data.phantom.labels import (
    FindingDetails,
    LabelSkew,
    check_labels,
    sample_details,
    sample_labels,
    study_rng,
)
from fedmrg.data.phantom.styles import (
    NEUTRAL_STYLE,
    STYLE_NAMES,
    STYLES,
    ReportStyle,
    get_style,
    neutral_corpus,
    report_from_labels,
)

PHANTOM_VERSION = "1"

__all__ = [
    "PHANTOM_VERSION",
    "NEUTRAL_STYLE",
    "STYLE_NAMES",
    "STYLES",
    "FindingDetails",
    "LabelSkew",
    "ReportStyle",
    "check_labels",
    "get_style",
    "neutral_corpus",
    "report_from_labels",
    "sample_details",
    "sample_labels",
    "study_rng",
]
