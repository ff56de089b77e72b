import os

GREETING = os.environ.get("GREETING", "hello")


def handler(event, context):
    if isinstance(event, dict) and "requestContext" in event:  # API Gateway payload 2.0
        name = (event.get("pathParameters") or {}).get("name", "world")
    else:
        name = event.get("name", "world") if isinstance(event, dict) else "world"
    print(f"greeting {name}")
    return {
        "message": f"{GREETING} {name}",
        "function": context.function_name,
        "requestId": context.aws_request_id,
    }
