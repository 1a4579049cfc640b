"""The processor of a megavl model exported for transformers (trust_remote_code=True).

Qwen2.5-VL's processor for images and text: the chat template lays a conversation out as
megavl's training did, each <|image_pad|> of the text becomes one pad per merged vision
token of its image, and the image processor sizes and patches images as megavl's training
pipeline does (the same min / max pixels, patch and merge sizes, mean and std). megavl
models take no video, so the processor has no video processor (Qwen2.5-VL's needs
torchvision even for images).
"""

from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin


class MegavlProcessor(Qwen2_5_VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token = "<|video_pad|>"
        self.video_token_id = None
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
