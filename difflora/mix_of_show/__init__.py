"""Mix-of-Show: ED-LoRA concepts, gradient fusion of many concepts, regionally controlled sampling."""
