from setuptools import find_packages, setup

setup(
    name="focal_det2",
    version="0.1.0",
    description="RetinaNet with the focal loss (Lin et al., ICCV 2017) as a Detectron2 plugin",
    packages=find_packages(include=["focal_det2", "focal_det2.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "fvcore",
        "numpy",
        "pycocotools",
        "Pillow",
        "scikit-learn",
        "scikit-image",
        "faster-coco-eval",
        "matplotlib",
        "opencv-python-headless",
        "tqdm",
    ],
    # python -m focal_det2.export and focal_det2.export.OnnxPredictor
    extras_require={"export": ["onnx", "onnxruntime", "onnxscript"]},
)
