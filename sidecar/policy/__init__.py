"""May it do this? The policy input document, the engines, and their decision."""
