"""Answer a prompt with transformers from an exported HF folder (greedy, chat template).

A PEFT adapter folder (`megatron export --adapter_load run --merge_lora false`) is loaded with
peft onto its base model (`base_model_name_or_path` in adapter_config.json).
"""

import json
import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_dir: str, prompt: str) -> None:
    adapter = Path(model_dir) / "adapter_config.json"
    if adapter.exists():
        from peft import PeftModel

        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        tok = AutoTokenizer.from_pretrained(base)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), model_dir)
    else:
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    print(f"prompt: {prompt}\nanswer: {tok.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
