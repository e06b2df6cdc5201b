"""Text for the CLIP encoders: the offline tokenizer and the prompt syntax (emphasis, long prompts)."""
