"""The built-in seeded target kinds, registered like a third-party plugin's (`register_targets`)."""

from ..hookspecs import hookimpl
from .targets import parse_box, parse_segmentation, parse_similarity


@hookimpl
def register_targets(register):
    register("seg", parse_segmentation, options=("region",))
    register("similar", parse_similarity)
    register("box", parse_box, options=("box_iou", "box_format", "box_layout"))
