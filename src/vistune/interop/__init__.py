"""Other layouts of a LLaVA model: export to and import from them, proven against
transformers.

- `hf_layout`: the HF Llava names and settings, each mapped one to one or refused;
- `hf_export`: a vistune model directory -> a `LlavaForConditionalGeneration` folder
  with its `LlavaProcessor` (`vistune export`), checked on a probe before it is written;
- `chat_template`: vistune's conversation templates as the processor's Jinja template;
- `model_card`: the export's README.md;
- `hf_import`, `llava_import`: a HF Llava folder / an official LLaVA checkpoint -> a
  vistune model directory (`vistune import`), through `assemble`.
"""
