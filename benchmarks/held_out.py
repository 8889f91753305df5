"""Held-out architectures, tried as a new user would: what compresses, what is refused, and
whether what comes out is right.

Tiny random-weight Hugging Face models of families spectrim's finders were not written
against (``--hf``), each with three targets (``--hf-targets``: half of every FFN, half the
heads, three quarters of the residual width), and timm image models (``--timm``) at
``macs=0.7`` on random 64² images (224² for a model that cannot take 64²).  For every run: ``compressed`` (with the MACs ratio, the groups pinned of all
groups and ``report.warnings``' count), ``refused`` (a ``ValueError`` / ``TypeError`` that
a ``raise`` of spectrim's own gave, whose message names the culprit, recorded) or
``crashed`` (anything else, a library's or Python's error included: a defect, with the
last lines of its traceback).  A compressed model is saved and reloaded onto a fresh
instance (``reload_max_diff``: the largest output difference, 0 when the round trip is
exact), and a causal LM's ``generate()`` is run.

Correctness where weights are random: ``stream_rewrite_error`` (hidden runs) is the
relative output error of the stream's exact rewrite and a random rotation (float rounding
when every norm is read right: OLMo's LayerNorm, whose eps is no attribute, was 0.018 off
before its eps was measured).  ``dead_heads_error`` (heads runs) is the relative
logit error after zeroing the value rows of the second half of every layer's heads (their
outputs are then zero) and compressing to half the heads with ``id``, one shot.  Exact
removal gives float rounding (about 1e-7); a finder that read the layout wrong removes
other rows and gives an error of order 0.1 (GPTBigCode read as GPT-2 did: 0.13).
Mixture-of-experts families (``MOE``) also run ``experts=0.5``; there
``repeated_neurons_error`` is the relative logit error after making the second half of
every expert's neurons copies of the first and compressing to half of them with ``id``
(its folds give the copies back: float rounding).

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/held_out.py \\
        --out benchmarks/results/held_out.json                                  # ~3 min

``--timm-more`` runs 55 other timm models instead (stop 49's sweep, which found the
channels_last crash on a 5-D parameter, the weight-standardised convs of NF-ResNets and
the wrong Gram rows of ``Conv2dSame``), with no Hugging Face families:

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/held_out.py --timm-more \\
        --images 48 --out benchmarks/results/held_out_timm_more.json            # ~6 min

``--hf-more`` runs 66 more Hugging Face text families instead (stop 50's sweep, which
found the experts' folds fitted to noise when the router sends an expert fewer tokens than
it has neurons, the stream layouts with parts the finders did not know, and the attention
layers whose heads were not all of them), with no timm models:

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/held_out.py --hf-more \
        --out benchmarks/results/held_out_hf_more.json                          # ~5 min

``--hf-seq2seq`` runs tiny Hugging Face encoder-decoder families (``all``: the 24 of
``SEQ2SEQ``, stop 51's sweep: T5 and its kin, BART and its kin, LED, ProphetNet, Whisper,
Speech2Text, a ViT encoder with a GPT-2 decoder, BERT2BERT, ...) at the
``--hf-targets``, calibrated on their encoder's input with ``decoder_input_ids``, with
``generate()`` checked through the cache.  For the families whose experts are modules
(SwitchTransformers, NLLB-MoE) ``repeated_neurons_error`` is measured at ``width=0.5`` with
the sequential pass: every FFN's second half of neurons copies of the first, the experts'
included, so the experts' folds (the original model's, since their rows are routed) must
give float rounding.  (With copies the pruned prefix computes what the original did, so
the router sends the same rows: this checks the folds, not the routing; the run at
``width=0.5`` itself crashed on SwitchTransformers before the routed experts were read.)

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/held_out.py --hf --timm \
        --hf-seq2seq all --out benchmarks/results/held_out_seq2seq.json         # ~1 min

``--hf-vision`` runs tiny Hugging Face vision and audio families (``all``: the 15 of
``hf_vision_configs``) at the ``--hf-targets``, ``--torchvision`` torchvision
classification models at ``macs=0.7``:

    SPECTRIM_DATA=../shared/data .venv/bin/python benchmarks/held_out.py --hf --timm \\
        --hf-vision all --torchvision alexnet squeezenet1_1 mnasnet0_5 efficientnet_v2_s \\
        swin_t wide_resnet50_2 convnext_tiny shufflenet_v2_x0_5 regnet_y_400mf \\
        --images 48 --out benchmarks/results/held_out_vision.json               # ~3 min
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import spectrim
from _results import save_result
from spectrim.graph.attention import find_attention
from spectrim.graph.modules import module_kind
from spectrim.io.manifest import load_compressed, save_compressed

#: ``--timm-more``: families the first sweep did not try (stop 49)
TIMM_MORE = [
    "cspdarknet53", "cspresnet50", "levit_128s", "ghostnet_100", "xcit_nano_12_p16_224",
    "coat_lite_tiny", "pit_ti_224", "nf_resnet26", "dm_nfnet_f0", "mixer_s16_224",
    "resmlp_12_224", "gmlp_ti16_224", "ese_vovnet19b_dw", "selecsls42b", "edgenext_xx_small",
    "lambda_resnet26t", "halonet26t", "eva02_tiny_patch14_224", "deit3_small_patch16_224",
    "cait_xxs24_224", "twins_pcpvt_small", "pvt_v2_b0", "crossvit_tiny_240", "sequencer2d_s",
    "nest_tiny", "visformer_tiny", "gcvit_xxtiny", "davit_tiny", "focalnet_tiny_srf",
    "mvitv2_tiny", "hiera_tiny_224", "repghostnet_050", "efficientvit_m0", "tinynet_e",
    "lcnet_050", "mixnet_s", "fbnetv3_b", "hardcorenas_a", "densenet121", "inception_v3",
    "gernet_s", "resnest14d", "skresnet18", "sebotnet33ts_256", "cs3darknet_s",
    "vit_tiny_patch16_224", "mobilenetv4_conv_small", "mobilenetv3_small_050", "rdnet_tiny",
    "fasternet_t0", "shvit_s1", "vgg11", "xception41", "tf_efficientnet_b0",
    "tf_mobilenetv3_small_100",
]  # fmt: skip

# the few-second run of the test suite (tests/test_bench.py; spectrim bench --smoke)
SMOKE = ["--hf", "gpt_bigcode", "phi3", "--hf-vision", "swin", "--hf-seq2seq", "t5",
         "--timm", "resnet10t", "--images", "48"]  # fmt: skip

VOCAB = 100
#: ``--hf-more`` (stop 50): more Hugging Face text families, each built with
#: ``AutoConfig.for_model(family, **TINY, **overrides)``
HF_MORE: dict[str, dict[str, Any]] = {
    "gemma2": {}, "gemma3_text": {}, "cohere": {}, "cohere2": {}, "olmo2": {}, "olmo3": {},
    "qwen3_moe": dict(num_experts=4, moe_intermediate_size=24, num_experts_per_tok=2),
    "starcoder2": {}, "persimmon": {}, "nemotron": {}, "glm": dict(pad_token_id=0),
    "glm4": dict(pad_token_id=0), "helium": dict(head_dim=8), "exaone4": {},
    "smollm3": dict(pad_token_id=0), "mamba": {}, "falcon_h1": {}, "granitemoe": {},
    "jetmoe": {}, "phimoe": {}, "arcee": {}, "seed_oss": {}, "ernie4_5": {}, "apertus": {},
    "lfm2": {}, "gpt_oss": dict(num_local_experts=4, head_dim=8), "mpt": {}, "xglm": {},
    "biogpt": {}, "openai-gpt": {}, "internlm3": {}, "vaultgemma": {}, "bitnet": {},
    "diffllama": {}, "doge": {}, "nanochat": {}, "modernbert-decoder": dict(pad_token_id=0),
    "llama4_text": {}, "minimax": {},
    "bert": {}, "distilbert": {}, "mobilebert": {}, "convbert": {}, "roformer": {},
    "big_bird": {}, "longformer": {}, "nystromformer": {}, "camembert": {},
    "data2vec-text": {}, "ibert": {}, "megatron-bert": {}, "rembert": {},
    "roberta-prelayernorm": {}, "nomic_bert": {}, "jina_embeddings_v3": {}, "ernie": {},
    "fnet": {}, "mra": {}, "yoso": {}, "splinter": {}, "deberta": {}, "flaubert": {},
    "xlm": {}, "modernbert": dict(pad_token_id=0), "eurobert": dict(pad_token_id=0),
    "esm": dict(pad_token_id=1, mask_token_id=2),
}  # fmt: skip
#: families with mixture-of-experts layers: ``experts=0.5`` is tried on them too
MOE = {"mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "granitemoe", "jetmoe", "phimoe",
       "gpt_oss", "minimax", "llama4_text"}  # fmt: skip
ENCODERS = {"albert", "electra", "deberta-v2", "deberta-v3", "roberta", "mpnet", "xlm-roberta",
            "bert", "distilbert", "mobilebert", "convbert", "roformer", "big_bird",
            "longformer", "nystromformer", "camembert", "data2vec-text", "ibert",
            "megatron-bert", "rembert", "roberta-prelayernorm", "nomic_bert",
            "jina_embeddings_v3", "ernie", "fnet", "mra", "yoso", "splinter", "deberta",
            "flaubert", "xlm", "modernbert", "eurobert", "esm"}  # fmt: skip


def hf_configs() -> dict[str, Callable[[], Any]]:
    """Tiny configs: width 32, 2 layers, 4 heads (2 KV heads where the family has GQA)."""
    import transformers as t

    s = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4)  # fmt: skip
    gpt = dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4)
    relative = dict(relative_attention=True, position_buckets=8, pos_att_type=["p2c", "c2p"])
    return {
        "mistral": lambda: t.MistralConfig(num_key_value_heads=2, **s),
        "qwen2": lambda: t.Qwen2Config(num_key_value_heads=2, **s),
        "qwen3": lambda: t.Qwen3Config(num_key_value_heads=2, head_dim=8, **s),
        "gemma": lambda: t.GemmaConfig(num_key_value_heads=1, head_dim=8, **s),
        "granite": lambda: t.GraniteConfig(num_key_value_heads=2, **s),
        "olmo": lambda: t.OlmoConfig(pad_token_id=0, **s),
        "stablelm": lambda: t.StableLmConfig(num_key_value_heads=2, **s),
        "mixtral": lambda: t.MixtralConfig(num_key_value_heads=2, num_local_experts=4, **s),
        "qwen2_moe": lambda: t.Qwen2MoeConfig(
            num_key_value_heads=2,
            num_experts=4,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=32,
            **s,
        ),
        "olmoe": lambda: t.OlmoeConfig(
            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, **s
        ),
        "phi": lambda: t.PhiConfig(**s),
        "phi3": lambda: t.Phi3Config(num_key_value_heads=2, pad_token_id=0, **s),
        "gpt_neox": lambda: t.GPTNeoXConfig(**s),
        "falcon": lambda: t.FalconConfig(**{**s, "intermediate_size": None}),
        "falcon-mha": lambda: t.FalconConfig(multi_query=False, **{**s, "intermediate_size": None}),
        "falcon-rw": lambda: t.FalconConfig(
            alibi=True, multi_query=False, **{**s, "intermediate_size": None}
        ),
        "bloom": lambda: t.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
        "gptj": lambda: t.GPTJConfig(rotary_dim=4, **gpt),
        "codegen": lambda: t.CodeGenConfig(rotary_dim=4, **gpt),
        # 4 heads in CodeGen's 4 parts are one unit: 8 heads make two
        "codegen-8h": lambda: t.CodeGenConfig(rotary_dim=4, **{**gpt, "n_embd": 64, "n_head": 8}),
        "gpt_bigcode": lambda: t.GPTBigCodeConfig(**gpt),
        "gpt_bigcode-mha": lambda: t.GPTBigCodeConfig(multi_query=False, **gpt),
        "albert": lambda: t.AlbertConfig(embedding_size=16, **s),
        "electra": lambda: t.ElectraConfig(embedding_size=16, **s),
        "deberta-v2": lambda: t.DebertaV2Config(**s),
        "deberta-v3": lambda: t.DebertaV2Config(**relative, **s),
        "roberta": lambda: t.RobertaConfig(**s),
        "xlm-roberta": lambda: t.XLMRobertaConfig(**s),
        "mpnet": lambda: t.MPNetConfig(**s),
    }


#: ``--hf-seq2seq`` (stop 51): tiny encoder-decoders; BART-family configs share ``_BART``
SEQ2SEQ = ["t5", "t5-gated", "mt5", "umt5", "longt5", "switch_transformers", "bart", "mbart",
           "marian", "pegasus", "blenderbot", "blenderbot-small", "m2m_100", "plbart", "led",
           "bigbird_pegasus", "mvp", "nllb-moe", "prophetnet", "pegasus_x", "whisper",
           "speech_to_text", "vit-gpt2", "bert2bert"]  # fmt: skip
#: encoder-decoders whose experts are modules the router feeds (rows routed per expert)
ROUTED = {"switch_transformers", "nllb-moe"}


def seq2seq_model(family: str) -> nn.Module:
    """A tiny random-weight encoder-decoder of ``family`` (one of :data:`SEQ2SEQ`): from its
    config, or for ``vit-gpt2`` (an image captioner) and ``bert2bert`` composed of two."""
    import transformers as t

    torch.manual_seed(0)
    if family in ("vit-gpt2", "bert2bert"):
        bert = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=48)  # fmt: skip
        if family == "vit-gpt2":
            enc: Any = t.ViTConfig(image_size=32, patch_size=8, **{**bert, "vocab_size": None})
            dec: Any = t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                    add_cross_attention=True, is_decoder=True)  # fmt: skip
            config: Any = t.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        else:
            enc = t.BertConfig(**bert)
            dec = t.BertConfig(**bert, is_decoder=True, add_cross_attention=True)
            config = t.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
        config.decoder_start_token_id, config.pad_token_id = 1, 0
        holder = t.VisionEncoderDecoderModel if family == "vit-gpt2" else t.EncoderDecoderModel
        return holder(config).eval()  # type: ignore[no-any-return]
    speech = family in ("whisper", "speech_to_text")
    auto = t.AutoModelForSpeechSeq2Seq if speech else t.AutoModelForSeq2SeqLM
    return auto.from_config(seq2seq_config(family)).eval()  # type: ignore[no-any-return]


def seq2seq_config(family: str) -> Any:
    """The config of a tiny encoder-decoder of ``family`` (one of :data:`SEQ2SEQ`)."""
    import transformers as t

    bart = dict(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                decoder_ffn_dim=48, max_position_embeddings=64, pad_token_id=1,
                bos_token_id=0, eos_token_id=2, decoder_start_token_id=2)  # fmt: skip
    t5 = dict(vocab_size=VOCAB, d_model=32, d_ff=48, num_layers=2, num_decoder_layers=2,
              num_heads=4, d_kv=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)  # fmt: skip
    special: dict[str, Callable[[], Any]] = {
        "t5-gated": lambda: t.T5Config(feed_forward_proj="gated-gelu", **t5),
        "switch_transformers": lambda: t.SwitchTransformersConfig(
            num_experts=4, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, **t5),
        "marian": lambda: t.MarianConfig(**{**bart, "decoder_start_token_id": 1}),
        "led": lambda: t.LEDConfig(**bart, attention_window=[4, 4],
                                   max_encoder_position_embeddings=64,
                                   max_decoder_position_embeddings=64),
        "bigbird_pegasus": lambda: t.BigBirdPegasusConfig(**bart, attention_type="original_full"),
        "nllb-moe": lambda: t.NllbMoeConfig(**bart, num_experts=4, expert_capacity=64,
                                            encoder_sparse_step=2, decoder_sparse_step=2),
        "prophetnet": lambda: t.ProphetNetConfig(
            vocab_size=VOCAB, hidden_size=32, encoder_ffn_dim=48, decoder_ffn_dim=48,
            num_encoder_layers=2, num_decoder_layers=2, num_encoder_attention_heads=4,
            num_decoder_attention_heads=4, max_position_embeddings=64, ngram=2,
            pad_token_id=0, decoder_start_token_id=0, eos_token_id=2),
        "pegasus_x": lambda: t.PegasusXConfig(**bart, block_size=4, num_global_tokens=2),
        "whisper": lambda: t.WhisperConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
            decoder_ffn_dim=48, num_mel_bins=16, max_source_positions=16,
            max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None),
        "speech_to_text": lambda: t.Speech2TextConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
            decoder_ffn_dim=48, input_feat_per_channel=16, conv_channels=16,
            max_source_positions=64, max_target_positions=32, pad_token_id=0,
            bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
    }  # fmt: skip
    if family in special:
        return special[family]()
    kind = t5 if family in ("t5", "mt5", "umt5", "longt5") else bart
    return t.AutoConfig.for_model(family, **kind)


def seq2seq_batches(n: int, seed: int, family: str = "t5") -> list[dict[str, torch.Tensor]]:
    """``n`` batches of 8 × 6 decoder tokens, with 8 × 12 source tokens (half the rows end
    in 4 pads), or for ``whisper`` / ``speech_to_text`` 8 log-mel inputs (16 bins), for
    ``vit-gpt2`` 8 images of 32²."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for batch in token_batches(n, seed):
        if family == "whisper":
            batch = {"input_features": torch.randn(8, 16, 32, generator=g)}
        elif family == "speech_to_text":
            batch = {"input_features": torch.randn(8, 40, 16, generator=g)}
        elif family == "vit-gpt2":
            batch = {"pixel_values": torch.randn(8, 3, 32, 32, generator=g)}
        batch["decoder_input_ids"] = torch.randint(3, VOCAB, (8, 6), generator=g)
        out.append(batch)
    return out


def repeat_half_the_ffn_rows(model: nn.Module) -> None:
    """In every FFN of a T5- or BART-family model, the experts held as modules
    (``….experts.expert_i``) among them, make the second half of its first linear's rows
    (its neurons) copies of the first half."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.rpartition(".")[2] in ("wi", "fc1") and isinstance(mod, nn.Linear):
                half = mod.weight.shape[0] // 2
                mod.weight[half:] = mod.weight[:half]
                if mod.bias is not None:
                    mod.bias[half:] = mod.bias[:half]


def hf_vision_configs() -> dict[str, tuple[Callable[[], nn.Module], str]]:
    """Tiny Hugging Face vision and audio models (stop 49) and the input each takes:
    ``"image"`` (32² pixels), ``"audio"`` (400 samples) or ``"mel"`` (16 bins × 32)."""
    import transformers as t

    v = dict(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
             num_attention_heads=4, intermediate_size=64)  # fmt: skip
    win = dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
               window_size=4)  # fmt: skip
    a = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
             conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
             num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)  # fmt: skip
    return {
        "vit": (lambda: t.ViTModel(t.ViTConfig(**v)), "image"),
        "deit": (lambda: t.DeiTModel(t.DeiTConfig(**v)), "image"),
        "dinov2": (lambda: t.Dinov2Model(t.Dinov2Config(
            **{k: x for k, x in v.items() if k != "intermediate_size"}, mlp_ratio=2)), "image"),
        "beit": (lambda: t.BeitModel(t.BeitConfig(**v, use_relative_position_bias=True)),
                 "image"),
        "beit-shared": (lambda: t.BeitModel(
            t.BeitConfig(**v, use_shared_relative_position_bias=True)), "image"),
        "clip-vision": (lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**v)), "image"),
        "siglip-vision": (lambda: t.SiglipVisionModel(t.SiglipVisionConfig(**v)), "image"),
        "swin": (lambda: t.SwinModel(t.SwinConfig(**win)), "image"),
        "swinv2": (lambda: t.Swinv2Model(t.Swinv2Config(**win)), "image"),
        "resnet": (lambda: t.ResNetModel(t.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1])), "image"),
        "mobilevit": (lambda: t.MobileViTModel(t.MobileViTConfig(
            image_size=32, hidden_sizes=[16, 24, 32],
            neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32])), "image"),
        "segformer": (lambda: t.SegformerModel(t.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
            num_attention_heads=[1, 2], patch_sizes=[7, 3], strides=[4, 2],
            mlp_ratios=[2, 2])), "image"),
        "wav2vec2": (lambda: t.Wav2Vec2Model(t.Wav2Vec2Config(**a)), "audio"),
        "hubert": (lambda: t.HubertModel(t.HubertConfig(**a)), "audio"),
        "whisper-classifier": (lambda: t.WhisperForAudioClassification(t.WhisperConfig(
            d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
            decoder_layers=1, decoder_attention_heads=4, decoder_ffn_dim=64, num_mel_bins=16,
            max_source_positions=16)), "mel"),
    }  # fmt: skip


def signal_batches(kind: str, n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` random batches of 16 for a vision or audio model's input ``kind``."""
    g = torch.Generator().manual_seed(seed)
    shape, key = {
        "image": ((16, 3, 32, 32), "pixel_values"),
        "audio": ((16, 400), "input_values"),
        "mel": ((16, 16, 32), "input_features"),
    }[kind]
    return [{key: torch.randn(shape, generator=g)} for _ in range(n)]


def hf_model(family: str) -> nn.Module:
    import transformers as t

    torch.manual_seed(0)
    cls = t.AutoModel if family in ENCODERS else t.AutoModelForCausalLM
    if family in HF_MORE:
        tiny = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
        return cls.from_config(t.AutoConfig.for_model(family, **tiny, **HF_MORE[family])).eval()
    return cls.from_config(hf_configs()[family]()).eval()


def token_batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """``n`` padded batches of 8 × 12 random tokens (half the rows end in 4 pads)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, VOCAB, (8, 12), generator=g)
        mask = torch.ones_like(ids)
        mask[:4, 8:] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def output(model: nn.Module, x: Any) -> torch.Tensor:
    with torch.no_grad():
        y = model(**x) if isinstance(x, dict) else model(x)
    for name in ("logits", "last_hidden_state"):
        if hasattr(y, name):
            return getattr(y, name)  # type: ignore[no-any-return]
    return y if isinstance(y, torch.Tensor) else y[0]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def kill_half_the_heads(model: nn.Module) -> None:
    """Zero the value rows of the second half of every layer's units (their heads then
    output nothing)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for b in find_attention(model):
            (v,) = [p for p in b.projections if p.role == "v"]
            rows = torch.as_tensor(b.projection_rows(v, range(b.units // 2, b.units)))
            mod = modules[v.module]
            kind = module_kind(mod)
            assert kind is not None
            mod.weight.index_fill_(kind.weight_dims[0], rows, 0.0)
            bias = getattr(mod, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias[rows] = 0.0


def repeat_half_the_neurons(model: nn.Module) -> None:
    """In every expert, make the second half of the neurons copies of the first (their
    gate and up rows): ``id`` at ``experts=0.5`` must then fold them away exactly."""
    from spectrim.graph.experts import find_experts

    with torch.no_grad():
        for block in find_experts(model):
            gate_up, _ = block.weights(model)
            w, half = block.width, block.width // 2
            gate_up[:, half:w] = gate_up[:, :half]
            gate_up[:, w + half :] = gate_up[:, w : w + half]


def stream_rewrite_error(model: nn.Module, test: Any) -> float:
    """The relative output error of the stream's exact rewrite (norm affines folded, a
    pre-LN stream centred and its LayerNorms made RMSNorms) followed by a random rotation
    of a pre-LN stream: float rounding when every norm, writer and reader is read right."""
    from spectrim._hidden import convert_stream, narrow_stream
    from spectrim.graph.stream import find_stream

    with torch.no_grad():  # trained norms are not the identity: make these not so either
        g = torch.Generator().manual_seed(1)
        for mod in model.modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and w.dim() == 1:
                w.copy_(0.5 + torch.rand(w.shape, generator=g))
    ref = output(model, test)
    found = find_stream(model)
    assert found is not None
    stream = convert_stream(model, found)
    if stream.kind == "pre":
        q, _ = torch.linalg.qr(torch.randn(stream.width, stream.width, dtype=torch.float64))
        narrow_stream(model, stream, q)
    return relative(output(model, test), ref)


def refused_by_spectrim(e: BaseException) -> bool:
    """Whether ``e`` is one of spectrim's own refusals: raised by a ``raise`` statement in
    spectrim's code, not by a library it called or by Python at a call whose arguments did
    not fit (LongT5's ``compute_bias() got an unexpected keyword argument``, which the
    first version of this sweep counted as a refusal)."""
    last = traceback.extract_tb(e.__traceback__)[-1]
    mine = Path(last.filename).resolve().is_relative_to(Path(spectrim.__file__).resolve().parent)
    return mine and (last.line or "").lstrip().startswith("raise")


def attempt(
    make: Callable[[], nn.Module],
    calib: list[Any],
    test: Any,
    target: str,
    causal: bool,
    seq2seq: bool = False,
) -> dict[str, Any]:
    """One compression as a user would run it, classified and checked (``generate()``
    for a causal LM and for an encoder-decoder, ``seq2seq``)."""
    rec: dict[str, Any] = {"target": target}
    model = make()
    t0 = time.perf_counter()
    try:
        small, report = spectrim.compress(model, calib, "id", target)
    except (ValueError, TypeError) as e:
        if refused_by_spectrim(e):  # the documented refusals: the culprit is named
            rec.update(status="refused", message=str(e)[:400])
            return rec
        tb = traceback.format_exc().splitlines()[-6:]  # raised elsewhere: a defect
        rec.update(status="crashed", message=f"{type(e).__name__}: {e}"[:400], traceback=tb)
        return rec
    except Exception as e:  # a defect
        tb = traceback.format_exc().splitlines()[-6:]
        rec.update(status="crashed", message=f"{type(e).__name__}: {e}"[:400], traceback=tb)
        return rec
    rec.update(
        status="compressed",
        seconds=round(time.perf_counter() - t0, 2),
        macs_ratio=round(report.macs_ratio, 4),
        params_ratio=round(report.params_ratio, 4),
        groups=len(report.groups),
        pinned=sum(1 for g in report.groups if g.pinned),
        warnings=len(report.warnings),
        output_error=relative(output(small, test), output(model, test)),
    )
    with tempfile.TemporaryDirectory() as d:
        save_compressed(small, Path(d) / "m", report)
        back = load_compressed(Path(d) / "m", make())
        rec["reload_max_diff"] = float((output(back, test) - output(small, test)).abs().max())
    if causal:
        ids = test["input_ids"][:1, :4]
        out = small.generate(  # at least 3 tokens: a random model may say its EOS first
            ids, max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=0
        )
        rec["generate_ok"] = tuple(out.shape) == (1, 7)
    if seq2seq:  # 3 new tokens through the cache (Whisper returns them without its start)
        source = {k: v[:2] for k, v in test.items() if not k.startswith("decoder_")}
        out = small.generate(**source, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        rec["generate_ok"] = out.shape[0] == 2 and out.shape[1] in (3, 4)
    if target.startswith("hidden"):
        rec["stream_rewrite_error"] = stream_rewrite_error(make(), test)
    if target.startswith("heads"):
        dead = make()
        kill_half_the_heads(dead)
        cut, _ = spectrim.compress(dead, calib, "id", "heads=0.5", sequential=False)
        rec["dead_heads_error"] = relative(output(cut, test), output(dead, test))
    if target.startswith("experts"):
        twice = make()
        repeat_half_the_neurons(twice)
        cut, _ = spectrim.compress(twice, calib, "id", "experts=0.5", sequential=False)
        rec["repeated_neurons_error"] = relative(output(cut, test), output(twice, test))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hf", nargs="*", default=list(hf_configs()))
    ap.add_argument("--hf-targets", nargs="*", default=["width=0.5", "heads=0.5", "hidden=0.75"])
    ap.add_argument(
        "--timm",
        nargs="*",
        default=["convnext_atto", "efficientnet_b0", "mobilevit_xxs", "swin_tiny_patch4_window7_224",
                 "poolformer_s12", "regnety_002", "repvgg_a0", "efficientformer_l1",
                 "fastvit_t8", "rexnet_100", "hrnet_w18_small", "dla34", "res2net50_14w_8s",
                 "dpn68", "maxvit_tiny_tf_224", "tiny_vit_5m_224", "efficientvit_b0",
                 "mobileone_s0", "hgnetv2_b0", "ghostnetv2_100", "inception_next_tiny",
                 "starnet_s1", "resnet10t"],
    )  # fmt: skip
    ap.add_argument(
        "--hf-vision",
        nargs="*",
        default=[],
        help="tiny Hugging Face vision/audio families (hf_vision_configs; 'all': every one) "
        "at the --hf-targets",
    )
    ap.add_argument(
        "--torchvision",
        nargs="*",
        default=[],
        help="torchvision classification models (random weights, 64² images) at macs=0.7",
    )
    ap.add_argument(
        "--timm-more",
        action="store_true",
        help="the 55 timm models of TIMM_MORE instead of --timm, and no --hf families",
    )
    ap.add_argument(
        "--hf-more",
        action="store_true",
        help=f"the {len(HF_MORE)} Hugging Face text families of HF_MORE instead of --hf, and "
        "no --timm",
    )
    ap.add_argument(
        "--hf-seq2seq",
        nargs="*",
        default=[],
        help=f"tiny Hugging Face encoder-decoder families (SEQ2SEQ; 'all': its {len(SEQ2SEQ)}) "
        "at the --hf-targets",
    )
    ap.add_argument("--images", type=int, default=96, help="random calibration images (timm)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "held_out.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.timm_more:
        args.timm, args.hf = TIMM_MORE, []
    if args.hf_more:
        args.hf, args.timm = list(HF_MORE), []
    runs = []
    for family in SEQ2SEQ if args.hf_seq2seq == ["all"] else args.hf_seq2seq:
        make_s2s = functools.partial(seq2seq_model, family)
        calib, test = seq2seq_batches(4, 0, family), seq2seq_batches(1, 1, family)[0]
        for target in args.hf_targets:
            rec = {"model": family, "source": "transformers-seq2seq",
                   **attempt(make_s2s, calib, test, target, causal=False, seq2seq=True)}  # fmt: skip
            if family in ROUTED and target.startswith("width") and rec["status"] == "compressed":
                twice = make_s2s()
                repeat_half_the_ffn_rows(twice)
                cut, _ = spectrim.compress(twice, calib, "id", "width=0.5")
                rec["repeated_neurons_error"] = relative(output(cut, test), output(twice, test))
            print(family, target, rec["status"], rec.get("macs_ratio", rec.get("message")))
            runs.append(rec)
    for family in args.hf:
        calib, test = token_batches(4, 0), token_batches(1, 1)[0]
        targets = args.hf_targets
        if family in MOE and not any(t.startswith("experts") for t in targets):
            targets = [*targets, "experts=0.5"]
        for target in targets:
            rec = attempt(lambda f=family: hf_model(f), calib, test, target,  # type: ignore[misc]
                          causal=family not in ENCODERS)  # fmt: skip
            rec = {"model": family, "source": "transformers", **rec}
            print(rec["model"], target, rec["status"], rec.get("macs_ratio", rec.get("message")))
            runs.append(rec)
    vision = hf_vision_configs() if args.hf_vision else {}
    for family in list(vision) if args.hf_vision == ["all"] else args.hf_vision:
        make_v, kind = vision[family]
        calib, test = signal_batches(kind, 8, 0), signal_batches(kind, 1, 1)[0]
        for target in args.hf_targets:

            def make_seeded(make_v: Callable[[], nn.Module] = make_v) -> nn.Module:
                torch.manual_seed(0)
                return make_v().eval()

            rec = attempt(make_seeded, calib, test, target, causal=False)
            rec = {"model": family, "source": "transformers-vision", **rec}
            print(family, target, rec["status"], rec.get("macs_ratio", rec.get("message")))
            runs.append(rec)
    for name in args.torchvision:
        from torchvision import models

        def make_tv(name: str = name) -> nn.Module:
            torch.manual_seed(0)
            return getattr(models, name)(weights=None, num_classes=10).eval()  # type: ignore[no-any-return]

        g = torch.Generator().manual_seed(0)
        x = torch.randn(args.images, 3, 64, 64, generator=g)
        test = torch.randn(4, 3, 64, 64, generator=g)
        rec = {"model": name, "source": "torchvision",
               **attempt(make_tv, list(x.split(16)), test, "macs=0.7", False)}  # fmt: skip
        print(name, rec["status"], rec.get("macs_ratio", rec.get("message")))
        runs.append(rec)
    if args.timm:
        import timm

        for name in args.timm:

            def make(name: str = name) -> nn.Module:
                torch.manual_seed(0)
                try:
                    return timm.create_model(name, num_classes=10, img_size=64).eval()
                except TypeError:  # no img_size: a convolutional network
                    return timm.create_model(name, num_classes=10).eval()

            size = 64
            try:  # a model built for 224² only (position tables of fixed size)
                output(make(), torch.zeros(2, 3, size, size))
            except Exception:
                size = 224
            g = torch.Generator().manual_seed(0)
            x = torch.randn(args.images, 3, size, size, generator=g)
            calib = list(x.split(32))
            test = torch.randn(4, 3, size, size, generator=g)
            rec = {"size": size, **attempt(make, calib, test, "macs=0.7", False)}
            rec = {"model": name, "source": "timm", **rec}
            print(name, rec["status"], rec.get("macs_ratio", rec.get("message")))
            runs.append(rec)
    counts = {s: sum(r["status"] == s for r in runs) for s in ("compressed", "refused", "crashed")}
    save_result(args.out, {"benchmark": "held-out", "settings": vars(args), "counts": counts,
                           "runs": runs}, args.threads)  # fmt: skip


if __name__ == "__main__":
    main()
