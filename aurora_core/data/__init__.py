"""Ref-AVS data: the official-layout reader, the synthetic generator, Parquet shards and Ray Data."""

import warnings

# torchvision 0.29 marks its image codecs deprecated in favour of torchcodec, which is not in our pin
# set; they remain the decoder the project is tested with, so keep the logs free of that notice.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)
