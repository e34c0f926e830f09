"""Answer a prompt with transformers from an exported HF folder (greedy, chat template)."""

import sys

from transformers import AutoModelForCausalLM, AutoTokenizer


def main(model_dir: str, prompt: str) -> None:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    inputs = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=64, do_sample=False)
    print(f"prompt: {prompt}\nanswer: {tok.decode(out[0, inputs['input_ids'].shape[1]:], skip_special_tokens=True)}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
