"""The rule-set names, shared by the exporter side (composites) and the run-time side (methods)."""

EPSILON_PLUS_FLAT = "lrp-epsilon-plus-flat"
EPSILON_GAMMA_BOX = "lrp-epsilon-gamma-box"
EPSILON_ALPHA2_BETA1 = "lrp-epsilon-alpha2-beta1"
ATTN_LRP = "lrp-attn"
CP_LRP = "lrp-cp"
CHEFER_LRP = "lrp-chefer"
