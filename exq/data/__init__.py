"""Calibration and evaluation text: reading corpus files and cutting token streams into batches."""

from exq.data.corpus import Domain, domain_name, load_domains, read_text, split_tokens

__all__ = ["Domain", "domain_name", "load_domains", "read_text", "split_tokens"]
