"""Stage 1, profile: how the router uses each expert on calibration text."""

from exq.profiling.profiler import profile, profile_domains
from exq.profiling.routing_profile import DomainInfo, LayerProfile, RoutingProfile

__all__ = ["DomainInfo", "LayerProfile", "RoutingProfile", "profile", "profile_domains"]
