"""transformers-format teachers: config.json + safetensors read into the timm model with the same computation."""
