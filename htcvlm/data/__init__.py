"""Training data: the procedural VQA set and a reader for LLaVA-format instruction data.

- scenes: `Scene`s of 1–4 objects (shape, color, size, texture, position) and their Pillow rendering
- questions: closed-set semantic and detail questions about a scene, the answer vocabulary and templates
- dataset: `ProceduralVQA`, deterministic per (split, seed, index), and the `VQASample` both sets give
- llava: `read_llava()` for LLaVA-format JSON with images on disk; `LlavaConversations` (every conversation
  about one image packed, for training) and `LlavaVQA` (each turn alone)
"""

from htcvlm.data.dataset import (
    SPLITS,
    ProceduralVQA,
    VQASample,
    draw_question,
    draw_questions,
    sample_seed,
)
from htcvlm.data.llava import (
    LlavaConversations,
    LlavaData,
    LlavaError,
    LlavaFormatError,
    LlavaTurn,
    LlavaVQA,
    MissingImageError,
    by_image,
    conversations,
    read_llava,
)
from htcvlm.data.questions import (
    KIND_OF,
    QTYPES,
    Question,
    answer_vocabulary,
    answers_for,
    ask,
    question_templates,
)
from htcvlm.data.scenes import Scene, SceneObject, object_mask, render, sample_scene

__all__ = [
    "KIND_OF",
    "QTYPES",
    "SPLITS",
    "LlavaConversations",
    "LlavaData",
    "LlavaError",
    "LlavaFormatError",
    "LlavaTurn",
    "LlavaVQA",
    "MissingImageError",
    "ProceduralVQA",
    "Question",
    "Scene",
    "SceneObject",
    "VQASample",
    "answer_vocabulary",
    "answers_for",
    "ask",
    "by_image",
    "conversations",
    "draw_question",
    "draw_questions",
    "object_mask",
    "question_templates",
    "read_llava",
    "render",
    "sample_scene",
    "sample_seed",
]
