const GREETING = process.env.GREETING ?? 'hello';

export const handler = async (event, context) => {
  const name = event?.requestContext // API Gateway payload 2.0
    ? (event.pathParameters?.name ?? 'world')
    : (event?.name ?? 'world');
  console.log(`greeting ${name}`);
  return {
    message: `${GREETING} ${name}`,
    function: context.functionName,
    requestId: context.awsRequestId,
  };
};
