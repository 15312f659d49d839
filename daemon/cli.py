def main() -> None:
    print("openinfer")
