from detkd.models.builders import DETECTORS, DetectorSpec, build_detector
from detkd.models.detector import Detector

__all__ = ["DETECTORS", "Detector", "DetectorSpec", "build_detector"]
