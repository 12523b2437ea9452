"""Curvature: kinds (Hessian, GGN, Fisher exact and Monte-Carlo, empirical Fisher)
in structures (full, layer, kron, unit, diag, lowrank) as immutable factor pytrees."""

from fprecond.curvature.blocks import (
    CurvatureBlock,
    DenseBlock,
    DiagonalBlock,
    KroneckerBlock,
    KroneckerEigenBlock,
    UnitBlock,
)
from fprecond.curvature.dataset import DatasetCurvature, dataset_curvature, dataset_statistics
from fprecond.curvature.eigenbasis import EigenbasisEstimator, EigenbasisState
from fprecond.curvature.estimate import CurvatureEstimator, EstimatorState, estimate, estimator
from fprecond.curvature.lowrank import FactoredLowRankBlock, LowRankBlock
from fprecond.curvature.matrix import Curvature
from fprecond.curvature.plan import KINDS, STRUCTURES, Kind, Structure

__all__ = [
    "KINDS",
    "STRUCTURES",
    "Curvature",
    "CurvatureBlock",
    "CurvatureEstimator",
    "DatasetCurvature",
    "DenseBlock",
    "DiagonalBlock",
    "EigenbasisEstimator",
    "EigenbasisState",
    "EstimatorState",
    "FactoredLowRankBlock",
    "Kind",
    "KroneckerBlock",
    "KroneckerEigenBlock",
    "LowRankBlock",
    "Structure",
    "UnitBlock",
    "dataset_curvature",
    "dataset_statistics",
    "estimate",
    "estimator",
]
