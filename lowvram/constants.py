"""Numbers and names that several parts of lowvram share; each is defined here once.

Checkpoint layout (docs/model.md §2): the file and folder names of a Wan2.2-S2V-14B directory.
Video and schedule (docs/model.md §3): 25 fps output, clips of 48 frames = 12 latent frames = 4 blocks of
3 latent frames, one ring cache of 12 latent frames per denoising step, 73 frames of motion context, and
the 3 generated frames the reference drops at the start.
"""

GIB = 1024**3
ALIGN = 256  # byte alignment of tensors inside host slabs and planned buffers (vector loads, dtype views)

# checkpoint layout
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE_FILE = "Wan2.1_VAE.pth"
WAV2VEC_DIR = "wav2vec2-large-xlsr-53-english"

# video, audio and the streaming schedule
FPS = 25  # output frames per second (LiveAvatar's sample_fps)
AUDIO_RATE = 16000  # Hz: wav2vec2's input rate, and the rate of the muxed audio
CLIP_FRAMES = 48  # video frames per clip
FRAMES_PER_BLOCK = 3  # latent frames per block (one DiT forward)
LATENT_FRAMES = 12  # latent frames per clip (4 blocks)
BLOCKS_PER_CLIP = LATENT_FRAMES // FRAMES_PER_BLOCK
VIDEO_FRAMES_PER_LATENT = 4  # the VAE's temporal stride
KV_FRAMES = 12  # latent frames one step's ring cache holds
NUM_STEPS = 4  # denoising steps the LoRA is distilled for (= step caches)
MOTION_FRAMES = 73  # video frames of motion context (FramePack uses the last 19 latents)
DROPPED_FRAMES = 3  # generated frames dropped at the start of the video
