"""Phases of depth: what a phase request means (:mod:`.spec`), how phases are found in a layer distance matrix
(:mod:`.segment`: recursive max-cut, contiguous DP, choice of k, phase metrics) and whether they are more than
smooth drift (:mod:`.nulls`). Layer numbers throughout are output layers ``1..L``, except where a function works on
matrix rows (the segmenters' ``DPResult.phases`` are 0-based rows of the matrix it was given)."""

from raptor.phases.nulls import (
    NULLS,
    PHASE_STATISTICS,
    boundary_jump,
    lag_contrast,
    null_matrices,
    phase_null_test,
    toeplitz_null,
    variable_speed_null,
)
from raptor.phases.segment import (
    MAXCUT_VARIANTS,
    DPResult,
    brute_force_contiguous,
    check_distance,
    choose_k,
    contiguous_segmentation,
    cut_weight,
    max_cut_bruteforce,
    phase_metrics,
    recursive_max_cut,
    segment_costs,
)
from raptor.phases.spec import (
    PHASE_METHODS,
    PhaseSpec,
    boundaries_of,
    contiguous_partitions,
    equal_phases,
    format_phase,
    format_phases,
    is_contiguous,
    labels_from_phases,
    parse_layers,
    parse_phases,
    phase_runs,
    phases_from_analysis,
    validate_phases,
)

__all__ = ["DPResult", "MAXCUT_VARIANTS", "NULLS", "PHASE_METHODS", "PHASE_STATISTICS", "PhaseSpec", "boundaries_of",
           "boundary_jump", "brute_force_contiguous", "check_distance", "choose_k", "contiguous_partitions",
           "contiguous_segmentation", "cut_weight", "equal_phases", "format_phase", "format_phases", "is_contiguous",
           "labels_from_phases", "lag_contrast", "max_cut_bruteforce", "parse_layers", "parse_phases", "phase_metrics",
           "phase_null_test", "phase_runs", "phases_from_analysis", "recursive_max_cut", "segment_costs",
           "toeplitz_null", "validate_phases", "variable_speed_null", "null_matrices"]
