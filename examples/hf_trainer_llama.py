"""Fine-tune a tiny Llama with Hugging Face's Trainer on the bundled sample corpus, valuing every training
window against DM Mathematics validation rows at every step, then write the In-Run Data Shapley report.

    python examples/hf_trainer_llama.py [--steps 20] [--run_name hf_llama_example] [--results_dir Results]

CPU, well under a minute; nothing is downloaded: the model is built from a config, the corpus is the
bundled sample tokenized with GPT-2's BPE (pile_tools), the windows carry their provenance (domain,
document, token offset), so the report shows which texts helped.
"""
import os

import torch
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from ghost_common.flags import FlagParser
from ghost_integrations.hf import GradDotProdTrainer
from ghost_results import report
from GradDotProd_LM.settings import load_settings
from pile_tools import ensure_sample_dataset
from pile_tools.reader import PileReader
from pile_tools.tokenizer import load_gpt2_tokenizer

SEQ_LEN = 64
VAL_DOMAIN = "DM Mathematics"


def windows(reader, rows, seq_len):
    """`rows` fixed, non-overlapping windows of the corpus as Trainer items (labels = inputs: the model
    shifts them), each with its provenance."""
    batch = reader.fixed_batch(rows, seq_len)
    tokens = torch.from_numpy(batch.tokens[:, :seq_len])
    return [{"input_ids": tokens[i], "labels": tokens[i], "domain": batch.domain[i],
             "doc_id": int(batch.doc_id[i]), "token_offset": int(batch.token_offset[i])} for i in range(len(batch))]


def build_parser() -> FlagParser:
    parser = FlagParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    parser.add_argument("--run_name", default="hf_llama_example")
    parser.add_argument("--results_dir", default=None,
                        help="default: $GRADDOTPROD_RESULTS_DIR, the settings file's RESULTS_DIR, else ./Results")
    parser.add_argument("--data_dir", default=None, help="tokenized corpus (default: the bundled sample, built once)")
    return parser


def main(argv=None) -> str:
    args = build_parser().parse_args(argv)
    settings = load_settings()  # $GRADDOTPROD_RESULTS_DIR, ./config_file.py, else ./Results
    results_dir = args.results_dir or settings.results_dir
    data_dir = args.data_dir or ensure_sample_dataset(settings.sample_data_dir)
    train_set = windows(PileReader(data_dir, split="train"), 128, SEQ_LEN)
    val_rows = windows(PileReader(data_dir, split="validation", domains=[VAL_DOMAIN]), 2, SEQ_LEN)
    val_batch = {"input_ids": torch.stack([r["input_ids"] for r in val_rows]),
                 "labels": torch.stack([r["labels"] for r in val_rows]),
                 # their provenance, for valset.pkl and the report's validation section
                 **{name: [r[name] for r in val_rows] for name in ("domain", "doc_id", "token_offset")}}
    print("validation row 0:", repr(load_gpt2_tokenizer().decode(val_batch["input_ids"][0].tolist())[:120]))

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                                         bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=False,
                                         attention_dropout=0.0))  # dropout is refused (docs/METHOD.md, "Dropout")
    run_dir = os.path.join(results_dir, args.run_name)
    training_args = TrainingArguments(
        output_dir=os.path.join(run_dir, "trainer"), max_steps=args.steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=3e-3, lr_scheduler_type="constant", use_cpu=True,
        logging_steps=5, save_strategy="no", report_to=[], disable_tqdm=True, seed=0)
    trainer = GradDotProdTrainer(
        model=model, args=training_args, train_dataset=train_set, val_batch=val_batch, run_dir=run_dir,
        run_name=args.run_name, run_config={"data_dir": data_dir, "seq_len": SEQ_LEN, "val_domain": VAL_DOMAIN},
        save_interval=10)
    trainer.train()
    path = report.write_report(run_dir, top=5)
    print(f"dot products in {run_dir}/grad_dotprods; report: {path}")
    return path


if __name__ == "__main__":
    main()
