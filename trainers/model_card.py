"""The model card written next to a trained model: TRL's card, naming the base model however it was loaded.

TRL's template links `https://huggingface.co/{base_model}` and loads `model="{hub_model_id}"` unconditionally, which
reads "fine-tuned version of [None](https://huggingface.co/None)" for a model trained from a local folder and saved
without a Hub repository. This card names a local base model by its folder and points the quick start at wherever
the model was saved.
"""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

TEMPLATE = """\
---
{{ card_data }}
---

# Model Card for {{ model_name }}

This model is a fine-tuned version of {{ base_model }}{% if dataset %} on {{ dataset }}{% endif %}.
It has been trained using [TRL](https://github.com/huggingface/trl).

## Quick start

```python
from transformers import pipeline

question = "Is it ever acceptable to lie to protect a friend's feelings?"
generator = pipeline("text-generation", model="{{ location }}", device_map="auto")
output = generator([{"role": "user", "content": question}], max_new_tokens=128, return_full_text=False)[0]
print(output["generated_text"])
```

## Training procedure

This model was trained with {{ trainer_name }}, a method introduced in \
[{{ paper_title }}](https://huggingface.co/papers/{{ paper_id }}).

### Framework versions

{% for name, number in versions %}- {{ name }}: {{ number }}
{% endfor %}
## Citations

Cite {{ trainer_name }} as:

```bibtex
{{ citation }}
```

Cite TRL as:

```bibtex
{% raw %}@software{vonwerra2020trl,
  title   = {{TRL: Transformers Reinforcement Learning}},
  author  = {von Werra, Leandro and Belkada, Younes and Tunstall, Lewis and Beeching, Edward and Thrush, Tristan and Lambert, Nathan and Huang, Shengyi and Rasul, Kashif and Gallouédec, Quentin},
  license = {Apache-2.0},
  url     = {https://github.com/huggingface/trl},
  year    = {2020}
}{% endraw %}
```
"""

FRAMEWORKS = {"TRL": "trl", "Transformers": "transformers", "Pytorch": "torch", "Datasets": "datasets"}


def hub_id(name_or_path: str, kind: str = "models") -> str | None:
    """The Hub id behind a model (or dataset) name: the name itself, or the repository of a Hub cache folder.

    `None` for any other local folder or file, whose name means nothing on the Hub.
    """
    path = Path(name_or_path).expanduser()
    if not path.exists():
        try:
            validate_repo_id(name_or_path)
        except HFValidationError:
            return None  # data files, or a path that no longer exists
        return name_or_path
    for part in path.resolve().parts:  # <cache>/models--org--name/snapshots/<commit>
        if part.startswith(f"{kind}--"):
            return part[len(kind) + 2 :].replace("--", "/")
    return None


def _mention(name_or_path: str, kind: str) -> str:
    if not name_or_path:
        return f"a {kind[:-1]} built in memory"
    repo = hub_id(name_or_path, kind)
    if repo is not None:
        prefix = "" if kind == "models" else "datasets/"
        return f"[{repo}](https://huggingface.co/{prefix}{repo})"
    return f"the local {kind[:-1]} `{Path(name_or_path).name}`"


def model_card(
    *,
    base_model: str,
    model_name: str,
    location: str,
    trainer_name: str,
    paper: dict[str, str],
    tags: list[str],
    dataset_name: str | None = None,
) -> ModelCard:
    """The card of a model fine-tuned from `base_model` (Hub id or local folder), to be loaded from `location`."""
    dataset_id = hub_id(dataset_name, "datasets") if dataset_name else None
    card_data = ModelCardData(
        base_model=hub_id(base_model),
        datasets=dataset_id,
        library_name="transformers",
        model_name=model_name,
        tags=["generated_from_trainer", *tags],
    )
    return ModelCard.from_template(
        card_data,
        template_str=TEMPLATE,
        model_name=model_name,
        base_model=_mention(base_model, "models"),
        dataset=_mention(dataset_name, "datasets") if dataset_name else None,
        location=location,
        trainer_name=trainer_name,
        paper_title=paper["title"],
        paper_id=paper["id"],
        citation=paper["citation"],
        versions=[(name, version(package)) for name, package in FRAMEWORKS.items()],
    )
