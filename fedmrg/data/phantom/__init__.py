"""The phantom multi-center benchmark: synthetic chest radiographs + reports, dual heterogeneity.

Documented in docs/phantom.md. `PHANTOM_VERSION` names the benchmark: any change to what the
generator writes for a given seed (images, reports, labels, splits) must bump it.
"""

from fedmrg.data.phantom.acquisition import Acquisition, decode_png, encode_png
from fedmrg.data.phantom.anatomy import render_lateral, render_pa
from fedmrg.data.phantom.centers import (
    CENTER_PROFILES,
    HELDOUT,
    CenterProfile,
    center_ids,
    center_profiles,
)
from fedmrg.data.phantom.generator import (
    PHANTOM_VERSION,
    PhantomSample,
    assign_splits,
    generate_phantom,
    make_sample,
    sample_record,
)
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
    neutral_studies,
    radiology_lexicon,
    report_from_labels,
)

__all__ = [
    "CENTER_PROFILES",
    "HELDOUT",
    "NEUTRAL_STYLE",
    "PHANTOM_VERSION",
    "STYLE_NAMES",
    "STYLES",
    "Acquisition",
    "CenterProfile",
    "FindingDetails",
    "LabelSkew",
    "PhantomSample",
    "ReportStyle",
    "assign_splits",
    "center_ids",
    "center_profiles",
    "check_labels",
    "decode_png",
    "encode_png",
    "generate_phantom",
    "get_style",
    "make_sample",
    "neutral_corpus",
    "neutral_studies",
    "radiology_lexicon",
    "render_lateral",
    "render_pa",
    "report_from_labels",
    "sample_details",
    "sample_labels",
    "sample_record",
    "study_rng",
]
