"""May it do this? The policy input document, the catalog, and OPA's decision."""
